"""``python -m flexact``: the flexact command line."""

from flexact.cli import main

if __name__ == "__main__":
    main()
