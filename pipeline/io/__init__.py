"""Checkpoint I/O: lazy readers for every accepted layout, a streaming writer, atomic outputs."""

from pipeline.io.compat import check_compatible
from pipeline.io.output import StagedOutput, open_staged_output, write_json_atomic
from pipeline.io.reader import Checkpoint, TensorSpec, open_checkpoint
from pipeline.io.safetensors_io import SafetensorsFile, write_safetensors, write_stream

__all__ = ["Checkpoint", "SafetensorsFile", "StagedOutput", "TensorSpec", "check_compatible",
           "open_checkpoint", "open_staged_output", "write_json_atomic", "write_safetensors",
           "write_stream"]
