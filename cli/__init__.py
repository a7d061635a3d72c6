"""The protocache command line: a thin typer app over the pipeline functions."""
