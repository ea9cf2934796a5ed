"""Features and online anomaly models: pure Python, no I/O. Fed by ``stream``, configured by ``spec``."""
