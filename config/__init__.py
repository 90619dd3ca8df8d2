"""Settings, logging and Celery configuration of tokenwarden."""
