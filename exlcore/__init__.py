"""exlcore: run LLMs in mixed-bitrate formats (EXL2) and others fast on NVIDIA GPUs, with architectures as plugins."""

from exlcore.conversion import convert
from exlcore.errors import ExlError
from exlcore.generator import Generator
from exlcore.loader import load

__all__ = ["ExlError", "Generator", "convert", "load"]
