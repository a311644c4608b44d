"""One deploy package, in layers (each imports only those below it): ``export`` (the export stage and its gate) →
``builders`` (the ONNX Runtime GenAI model builder, the int4 base) → ``formats`` (the adapter file and its bake,
int4 weights, the tokenizer file) → ``runtime`` (what serves an exported folder: no torch, no transformers)."""
