"""What builds an ONNX model from a transformers folder: the ONNX Runtime GenAI model builder, run offline and read
back (``genai``), and the int4 base with LoRA slots and its de-quantized twin (``int4_base``)."""
