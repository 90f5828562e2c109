"""Other servers (Flask + gunicorn, LitServe, Ray Serve) running splitserve's own OCR code.

Every peer wraps ``splitserve.runtime.inprocess.InProcessService(OCRService)``, so a
comparison measures the serving design, never a different pipeline. ``run_peers.py``
starts, checks, loads and stops each one in turn.
"""
