"""The HTTP inspection service (FastAPI). No tensor maths here: models live in ``models/``.

Entry point: :func:`service.app.create_app` (an app factory for uvicorn).
"""
