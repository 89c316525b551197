"""Offline export of a model folder to deployable graphs (ONNX, TensorRT), verified numerically.

    build.py        ``export_model``: the ``atop export`` command (serving folder, atomic write, card section)
    onnx_export.py  the ONNX graph (torch.onnx dynamo exporter), ORT sessions, the graph contract
    verify.py       exported-vs-eager comparison on real test images, tolerances
    optimize.py     faster CPU variants (offline-optimised, int8), measured and gated
    tensorrt.py     Torch-TensorRT fp16 export (GPU only)
    store.py        BentoML model store registration and listing
"""
