"""Stage 2, the conditional priors. CAM methods by name (`cams`), recording layers' outputs and gradients
(`hooks`), the maps' common scaling (`resize`), how priors are formed (`spec`), the all-layer extractor
(`extract`), prior-file metadata (`meta`), the prior file and prior set formats (`priorfile`, `priorset`, opened by
`read`), the released code's files (`released`), the priors stage (`stage`), priors of randomised CNN copies
(`random_priors`) and `python -m cnnprior.priors` (`cli`)."""
