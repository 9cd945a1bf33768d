"""Data shipped with bulksend: the sample subscriber list used by the README and the demo."""
