"""``python -m radstream`` is the ``radstream`` command."""

from radstream.cli import main

if __name__ == "__main__":
    main()
