import sys
from pathlib import Path

# The spawned ranks import test modules by name; make tests/ importable for them.
sys.path.insert(0, str(Path(__file__).parent))
