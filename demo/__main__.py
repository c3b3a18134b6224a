"""``python -m demo [--out runs/demo] [--quick] [--full | --compare]``: the demo end to end (:mod:`demo.run`)."""

from demo.run import main

if __name__ == "__main__":
    raise SystemExit(main())
