"""Engine building: precision preparation, the accuracy gate, the fp32 search, the cache.

``builder.build`` is the one entry point, used by ``splitserve build`` (``cli``) and by
servers on start (``artifacts.prepare_artifacts``). Nothing is imported here, so the
command line pays for onnx and onnxruntime only when it builds.
"""

from __future__ import annotations


def missing_build_extra(exc: ModuleNotFoundError) -> ModuleNotFoundError:
    """``exc`` (a library of builds not installed) as an error that says what to install."""
    return ModuleNotFoundError(
        f"building engines needs the 'build' extra (module {exc.name!r} is missing): "
        "pip install 'splitserve[build]'",
        name=exc.name,
    )
