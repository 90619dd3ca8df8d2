"""The producer API's routers, one a door: events, leaks (GitHub, GitLab), health.

``producer.api.create_app`` includes them; each reaches what the routes share through
``producer.app_state``. Nothing here may import ``producer.api`` or ``tasks``.
"""
