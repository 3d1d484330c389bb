"""autoquant: pick, per layer and per input shape, the quantized linear kernel that is fastest here.

>>> from autoquant import autoquant
>>> # model = autoquant(model, example_input)   # tunes, finalizes, returns the model
>>> # autoquant.report(model)                   # what was chosen and why (a DataFrame)
"""

from .accuracy import BudgetResult
from .api import DEFAULT_CACHE, autoquant, cancel, finalize, get_report, is_recording, report
from .bench import BenchConfig, CountingTimer, CpuTimer, CudaTimer, FakeTimer
from .config import CostModel, TuneConfig
from .hardware import AUTOQUANT_VERSION as __version__
from .keys import BenchKey, Measurement, OpShape, Timed
from .plan import apply_plan, load_plan, save_plan
from .pretune import pretune
from .profile import ShapeProfile, record_shapes
from .quantize import quantize
from .serialize import load, save
from .store import MemoryStore, Store
from .subclass import AutoQuantizableLinearWeight
from .tune import CudaFaultError

__all__ = [
    "__version__", "autoquant", "cancel", "finalize", "is_recording", "report", "get_report", "DEFAULT_CACHE",
    "BenchConfig", "CountingTimer", "CpuTimer", "CudaTimer", "FakeTimer", "CostModel", "TuneConfig",
    "BenchKey", "Measurement", "OpShape", "Timed", "MemoryStore", "Store", "AutoQuantizableLinearWeight",
    "apply_plan", "load_plan", "save_plan", "pretune", "quantize", "ShapeProfile", "record_shapes", "save", "load",
    "CudaFaultError", "BudgetResult",
]
