"""bulksend: a bulk mailing engine that rotates over many SMTP accounts under their limits."""

__version__ = "0.1.0"
