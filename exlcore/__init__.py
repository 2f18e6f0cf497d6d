"""exlcore: quantize LLMs to mixed-bitrate formats and run them fast, with architectures as plugins."""

from exlcore.errors import ExlError
from exlcore.generator import Generator
from exlcore.loader import load

__all__ = ["ExlError", "Generator", "load"]
