"""Every stage, declared once: its plain function in ``tasks/`` (whose return annotation is the stage's result
type), the config sections it reads, the upstream stages whose folders it reads, whether it holds the ``gpu``
slot, and the libraries that shape its result.

The cache key and the output folder of a stage are derived from its declaration (``flows.caching.stage_dir``):
the sections named here, the upstream folders' published content, the source of every first-party module the
function imports (directly or not) and the versions of the libraries named here. Adding a stage is one
declaration here, one function in ``tasks/`` and one ``run(...)`` line in the flow (docs/architecture.md).
"""
from __future__ import annotations

import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

from prefect import Task, task

from flows.gpu import holds_gpu_slot
from tasks import base_model
from tasks.deploy import export
from tasks.deploy.builders import int4_base, openvino
from tasks.stages import evaluate, hub, ingest, merge, report, split, train, validate

TORCH_STACK = ("torch", "transformers", "peft", "accelerate", "tokenizers", "safetensors")


@dataclass(frozen=True)
class Stage:
    """One stage of the DAG.

    Attributes:
        name: the Prefect task name and the folder under ``<output.dir>/stages/``.
        fn: the plain function (works and is tested without Prefect).
        sections: config sections the function reads; they are part of its key (``data`` without its path:
            the data's content counts, not where it lives).
        needs: upstream stages whose folders it reads (their manifests are part of its key).
        gpu: holds a slot of the ``gpu`` concurrency limit while it runs (``flows.gpu``).
        libraries: distributions whose versions shape its result (part of its key).
    """

    name: str
    fn: Callable
    sections: tuple[str, ...] = ()
    needs: tuple[str, ...] = ()
    gpu: bool = False
    libraries: tuple[str, ...] = field(default=())

    @property
    def result(self) -> type:
        """The result type: ``fn``'s return annotation (a pydantic model, or a path as ``str``)."""
        return typing.get_type_hints(self.fn)["return"]

    @cached_property
    def task(self) -> Task:
        """The Prefect task: ``fn`` (holding the gpu slot when ``gpu``) named ``name``."""
        return task(holds_gpu_slot(self.fn) if self.gpu else self.fn, name=self.name)


PREPARE_BASE_MODEL = Stage("prepare-base-model", base_model.convert_gguf, libraries=("torch", "transformers", "gguf"))
VALIDATE = Stage("validate", validate.validate, sections=("data", "split", "model", "train"),
                 needs=("prepare-base-model",), libraries=("transformers", "tokenizers", "datasets", "safetensors"))
INGEST = Stage("ingest", ingest.ingest, sections=("data",), libraries=("datasets", "pyarrow"))
SPLIT = Stage("split", split.split, sections=("split",), needs=("ingest",), libraries=("scikit-learn",))
EVALUATE = Stage("evaluate", evaluate.evaluate, sections=("eval",), needs=("split",), gpu=True,
                 libraries=(*TORCH_STACK, "scikit-learn", "rouge-score", "sacrebleu"))
TRAIN = Stage("train", train.train, sections=("model", "lora", "train"), needs=("prepare-base-model", "split"),
              gpu=True, libraries=(*TORCH_STACK, "trl", "datasets", "bitsandbytes", "liger-kernel"))
MERGE = Stage("merge", merge.merge, sections=("merge",), needs=("train",), gpu=True,
              libraries=(*TORCH_STACK, "bitsandbytes"))
EXPORT = Stage("export", export.export, sections=("export",), needs=("merge", "evaluate"),
               libraries=(*TORCH_STACK, "onnx", "onnxruntime", "onnxruntime-genai", "onnx-ir"))
INT4_BASE = Stage("int4-base", int4_base.export_base, needs=("prepare-base-model",),
                  libraries=(*TORCH_STACK, "onnx", "onnxruntime", "onnxruntime-genai", "onnx-ir"))
NPU_BASE = Stage("npu-base", openvino.export_npu_base, needs=("prepare-base-model",),
                 libraries=(*TORCH_STACK, "openvino", "openvino-tokenizers", "nncf", "optimum-intel"))
REPORT = Stage("report", report.write_report)
PUBLISH_LATEST = Stage("publish-latest", report.update_latest)
PUSH_TO_HUB = Stage("push-to-hub", hub.push_run)  # after publish-latest only; never cached (output.push_to_hub)
