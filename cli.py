"""Run the flexact command line from a source checkout: ``python cli.py fit --config ...``."""

from flexact.cli import main

if __name__ == "__main__":
    main()
