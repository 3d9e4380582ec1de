"""Stage 2, the conditional priors: all-layer extraction (`extract`; its CAM methods, `cams`, live in
cnnprior/core/), the prior file and prior set formats (`priorfile`, `priorset`), the released code's files
(`released`), the priors stage (`stage`) and priors of randomised CNN copies (`random_priors`).
`python -m cnnprior.priors` inspects files."""
