"""Gunicorn's entry point, `http_shim.wsgi:app`: the application configured from the environment
(DRAGOMAN_GRPC_TARGET, DRAGOMAN_API_KEY, DRAGOMAN_MAX_UPLOAD_BYTES, DRAGOMAN_REQUEST_TIMEOUT,
DRAGOMAN_CORS_ORIGINS). Each worker builds its own when gunicorn imports this module after forking."""
from .app import create_app

app = create_app()
