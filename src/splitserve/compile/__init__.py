"""Engine building: precision preparation, the accuracy gate, the fp32 search, the cache.

``builder.build`` is the one entry point, used by ``splitserve build`` (``cli``) and by
servers on start (``artifacts.prepare_artifacts``). Nothing is imported here, so the
command line pays for onnx and onnxruntime only when it builds.
"""
