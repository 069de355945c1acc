"""Gunicorn's entry point, `http_shim.wsgi:app`: the application configured from the environment
(DRAGOMAN_GRPC_TARGET, DRAGOMAN_API_KEY, DRAGOMAN_HTTP_MAX_UPLOAD_BYTES, DRAGOMAN_HTTP_REQUEST_TIMEOUT,
DRAGOMAN_HTTP_CORS_ORIGINS). Each worker builds its own when gunicorn imports this module after forking."""
from .app import create_app

app = create_app()
