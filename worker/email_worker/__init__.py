"""Email worker: consumes the RabbitMQ work queue and sends over SMTP without losing mail."""

__version__ = "0.2.0"
