"""python -m retrain.beam: fill the bottleneck cache with an Apache Beam pipeline.

    python -m retrain.beam --image_dir photos --bottleneck_dir cache \\
        [--architecture ...] [--extraction_batch_size 32] [Beam pipeline options]

Flags other than the retrain ones are Beam pipeline options: ``--runner``,
``--direct_num_workers``, ``--direct_running_mode``, Dataflow/Flink/Spark
options. Without apache-beam installed it says how to install it and exits 2.
"""

import importlib.util
import logging
import sys

from retrain import arguments, cli, messages
from retrain import config as config_lib
from retrain.data import images
from retrain.errors import RetrainError

logger = logging.getLogger("retrain.beam")

FLAGS = (
    "image_dir",
    "bottleneck_dir",
    "architecture",
    "backbone_weights",
    "bottleneck_dtype",
    "engine",
    "extraction_batch_size",
)
PROG = "python -m retrain.beam"


def parse(argv):
    """(validated Config, Beam pipeline args) from the command line."""
    parser = arguments.OneLineErrorParser(
        prog=PROG,
        description="Fill the bottleneck cache with an Apache Beam pipeline. Flags not "
        "listed here are Beam pipeline options (--runner, --direct_num_workers, "
        "--direct_running_mode, Dataflow/Flink/Spark options).",
        argument_default=None,
    )
    cli.add_config_flags(parser, FLAGS)
    known, pipeline_args = parser.parse_known_args(argv)
    settings = {key: value for key, value in vars(known).items() if value is not None}
    config = config_lib.Config(**settings)
    config_lib.validate(config)
    return config, pipeline_args


def main(argv=None):
    """Returns the exit status: 0 done, 2 usage error or apache-beam missing."""
    messages.setup(PROG)
    if importlib.util.find_spec("apache_beam") is None:
        logger.error(
            "apache-beam is not installed; install the extra with "
            "pip install -e '.[beam]' (or pip install apache-beam)."
        )
        return 2
    try:
        config, pipeline_args = parse(argv)
        image_list = images.discover(config.image_dir)
        # apache_beam logs warnings about optional cloud libraries on import.
        logging.disable(logging.WARNING)
        try:
            from retrain.beam import pipeline
        finally:
            logging.disable(logging.NOTSET)
        summary = pipeline.run(config, pipeline_args, image_list)
    except RetrainError as error:
        logger.error("%s", error)
        return 2
    print(
        f"Extracted {summary['extracted']} images into shard files in "
        f"{config.bottleneck_dir} ({summary['failed']} failed); the next "
        "`python -m retrain` run merges them into the cache."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
