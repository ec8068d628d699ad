"""Models the evaluation runs: transformers' CLIP vision tower and how stored weights are put
into it (key matching, theta_0 + alpha * tau in place)."""
