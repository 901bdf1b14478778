from ._detect import CpuBudget as CpuBudget, detect_budget as detect_budget
from ._warnings import ThreadBudgetWarning as ThreadBudgetWarning
