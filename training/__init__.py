"""rdedge training: data, backbones, Reverse Distillation model, SimCLR auxiliary, training loop and evaluation.

Importing this package is cheap; torch is imported by the modules that need it."""
