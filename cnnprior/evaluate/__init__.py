"""Stage 4, the evaluation: its config (`config`), sanity-check maths (`sanity`), the registered report
sections (`sections/`) and the run that writes a report (`run`). `python -m cnnprior.evaluate --help`."""
