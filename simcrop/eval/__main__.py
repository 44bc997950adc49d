"""`python -m simcrop.eval <task> ...`; `ablation` is the experiment driver simcrop.experiments.ablation."""
import sys

if len(sys.argv) > 1 and sys.argv[1] == "ablation":
    from simcrop.experiments.ablation import main as ablation_main

    sys.exit(ablation_main(sys.argv[2:]))

from simcrop.eval.cli import main  # noqa: E402

sys.exit(main())
