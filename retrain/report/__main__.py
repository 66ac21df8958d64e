"""`python -m retrain.report OUTPUT_DIR`: rebuild a run's page; see retrain.report.main."""

import sys

from retrain.report import main

sys.exit(main())
