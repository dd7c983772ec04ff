"""`python -m benchmarks.pretrain`: pool pretraining by weight distillation on an ImageFolder
tree (the code lives in :mod:`benchmarks.models.pretrain`)."""
from benchmarks.models.pretrain import main

if __name__ == "__main__":
    main()
