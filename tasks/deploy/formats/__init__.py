"""The exported files, written and read without torch: the ONNX Runtime adapter file and its bake into the int4
graph (``adapter``), the int4 base's weights and LoRA slots (``int4``), the portable ``tokenizer.json``."""
