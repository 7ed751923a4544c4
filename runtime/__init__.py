"""rdedge runtime: camera -> model -> MQTT. Lean on purpose: numpy, opencv, paho-mqtt and an inference backend
(onnxruntime or tensorrt + cuda-python). It never imports torch, ``training`` or ``export``; a bundle directory
(ONNX parts, optional TensorRT engines and ``manifest.json``) is its only input from them."""

__version__ = "0.1.0"
