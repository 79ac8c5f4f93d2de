"""rtauto-autocontour: auto-contouring steps for rtauto.

Step types ``autocontour.segment`` (a registered model: ONNX Runtime, TorchScript or a MONAI
bundle) and ``autocontour.threshold`` (BODY and lungs by HU), model backends ``onnx``,
``torchscript`` and ``monai_bundle``. Loaded through the ``rtauto`` entry point group.
"""

__version__ = "0.1.0"
