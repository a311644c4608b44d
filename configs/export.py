"""``export``: ONNX export targets and the gate each must pass (tasks/deploy/export.py)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from configs.base import Section


class ExportConfig(Section):
    """ONNX export targets and the gate each must pass before it is published (tasks/deploy/export.py)."""

    enabled: bool = True
    targets: list[Literal["genai-int4-adapter", "genai-ladder", "onnx-fp32", "genai-int4", "genai-fp16",
                          "openvino-npu", "openvino-npu-adapter", "qnn-npu"]] = Field(
        ["genai-int4"], min_length=1, description="genai-int4-adapter: the adapter alone, served on one int4 base per "
        "base model (ONNX Runtime GenAI, CPU; several adapters share one process); genai-ladder: the smallest rung "
        "of export.ladder that passes the gate (merged, GenAI CPU); onnx-fp32: the model builder at fp32, GenAI CPU; "
        "genai-int4: ONNX Runtime GenAI int4 (MatMulNBits) for CPU; genai-fp16: GenAI fp16 for CUDA; "
        "openvino-npu: an OpenVINO IR for the Intel NPU (the first export.npu_weights rung that passes the gate, "
        "run on the NPU's static pipeline; needs the npu extra); openvino-npu-adapter: the LoRA adapter alone on "
        "one NPU base per base model (export.npu_adapter_weights); qnn-npu: a static QDQ ONNX model for the Qualcomm "
        "NPU (the first export.qnn_weights rung that passes the gate on the CPU provider, compiled for "
        "export.qnn_soc_model and checked on the QNN HTP emulator; needs the npu extra) (tasks/deploy/export.py).")
    ladder: list[Literal["int4", "int4-int8-head", "int4-mixed", "fp32"]] = Field(
        ["int4", "int4-int8-head", "int4-mixed", "fp32"], min_length=1, description="genai-ladder's rungs, tried "
        "in order: int4 (RTN), int4 with int8 LM head and embeddings (k_quant_last), int4 with int8 sensitive "
        "layers (k_quant_mixed), fp32 (tasks/deploy/export.py RUNGS).")
    npu_weights: list[Literal["int4-g128", "int4-channel", "int4-channel-awq", "int8"]] = Field(
        ["int4-g128", "int4-channel", "int4-channel-awq", "int8"], min_length=1, description="openvino-npu's rungs, "
        "tried in order: int4 symmetric per group of 128 weights, int4 symmetric per output channel (the two int4 "
        "forms the NPU takes), the latter data-aware (AWQ and scale estimation on export.calibration_rows train "
        "rows), int8 symmetric (NNCF through optimum-intel: tasks/deploy/builders/openvino.py NPU_WEIGHTS).")
    npu_adapter_weights: Literal["int4-g128", "int4-channel", "int8"] = Field(
        "int8", description="openvino-npu-adapter: the NPU base's weights (one base per base model and weights, "
        "shared by every job's adapter; no ladder: the gate passes or fails this one).")
    npu_max_prompt_len: int | None = Field(None, gt=0, description="openvino-npu: the NPU's static prompt window in "
                                           "tokens (longer prompts are refused); None = twice the longest test "
                                           "prompt, rounded up to a multiple of 64.")
    qnn_weights: list[Literal["w4a16", "w8a16", "w16a16"]] = Field(
        ["w8a16", "w16a16"], min_length=1, description="qnn-npu's rungs, tried in order: weights int4 / uint8 / "
        "uint16 per channel, activations uint16 (ONNX Runtime's QNN quantization: "
        "tasks/deploy/builders/qnn.py QNN_WEIGHTS).")
    calibration_rows: int = Field(64, gt=0, description="qnn-npu and openvino-npu's data-aware rungs: train rows "
                                  "(prompt and answer, spread evenly over the train split) whose activations "
                                  "calibrate the quantization.")
    qnn_context_len: int | None = Field(None, gt=0, description="qnn-npu: the static window in tokens, prompt and "
                                        "answer (each model call runs all of it); None = the longest test prompt "
                                        "plus the answer length, rounded up to a multiple of 64.")
    qnn_soc_model: int = Field(60, gt=0, description="qnn-npu: the Snapdragon SoC the EPContext model is compiled "
                               "for (the QNN provider's soc_model; 60: Snapdragon X Elite).")
    qnn_htp_arch: int = Field(73, gt=0, description="qnn-npu: that SoC's Hexagon NPU generation (htp_arch; 73: v73).")
    qnn_emulator_rows: int = Field(2, gt=0, description="qnn-npu: test rows answered on the QNN HTP emulator "
                                   "(EPContext model, CPU fallback disabled) and compared with the CPU provider's "
                                   "answers; the emulator is slow (SmolLM2-135M at a 128-token window: ~25 s a call).")
    match_quantization: bool = Field(True, description="With genai-int4-adapter: train and evaluate on the int4 "
                                     "base's de-quantized weights (tasks/deploy/builders/int4_base.py), so that "
                                     "the model the pipeline measures is the one the adapter export ships.")
    adapter_weights: Literal["folded", "fp32"] = Field(
        "folded", description="genai-int4-adapter: how the exported graph holds the LoRA weights. folded: lora_A "
        "int8, lora_B quantized into each projection's own int4/int8 MatMulNBits beside the weights it corrects "
        "(decodes at ~0.85x the merged int4 export); fp32: as trained, in MatMuls of their own (the evaluation's "
        "arithmetic, ~0.7x). The export gate measures the form chosen (tasks/deploy/formats/adapter.py, "
        "docs/benchmarks.md).")
    int4_algo_config: Literal["default", "rtn", "k_quant", "k_quant_mixed", "k_quant_last"] = Field(
        "k_quant_mixed", description="The model builder's int4 algorithm; k_quant_mixed keeps some layers in int8 "
        "(measured on banking77: docs/benchmarks.md).")
    int4_block_size: Literal[16, 32, 64, 128, 256] = Field(32, description="Weights per int4 scale.")
    int4_accuracy_level: Literal[1, 2, 3, 4] = Field(4, description="Activation type of int4 MatMuls: 1 fp32, "
                                                                    "2 fp16, 3 bf16, 4 int8 (fastest on CPU).")
    int4_is_symmetric: bool = Field(True, description="Symmetric int4 (no zero point); False = uint4 with zero point.")
    n_check_prompts: int = Field(5, gt=0, description="Test prompts of the greedy-agreement check.")
    max_new_tokens: int = Field(16, gt=0, description="Tokens decoded per greedy-agreement prompt.")
    min_greedy_agreement: float = Field(0.8, ge=0, le=1, description="Fraction of check prompts whose exported "
                                                                      "and PyTorch greedy outputs must match.")
    max_quality_drop: float = Field(0.01, ge=0, le=1, description="Largest allowed drop of the primary metric "
                                                                  "(accuracy / rouge_l) from the merged PyTorch "
                                                                  "model's on the same test rows (0.01 = 1 point).")
    max_eval_examples: int | None = Field(None, gt=0, description="Test rows of the quality check; None = all.")
