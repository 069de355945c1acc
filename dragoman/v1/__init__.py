"""dragoman.v1: speech_pb2 (messages), speech_pb2_grpc (SpeechService stub and servicer)."""
