import sys

from .allocator import use_tcmalloc


def main() -> int:
    use_tcmalloc()  # before anything allocates much: it may start this command again
    from .cli import main as cli_main

    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
