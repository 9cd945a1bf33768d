"""Message and page templates shipped with bulksend (bulksend.templates in the wheel)."""
