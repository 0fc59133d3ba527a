"""Measure the zoo's quality as shipped: pick each diffusion model's guidance scale on a small selection run
(200 samples, seeds 10_000+, never the reported ones), then measure 1,000 samples (seeds 0..999) at that scale and
save quality.json next to the weights. VAE and GAN have no settings to pick.

    python scripts/eval_zoo.py [unet dit vae gan] [--steps 20]
"""

from __future__ import annotations

import argparse
import json

import layerscope as ls
from layerscope.world import zoo
from layerscope.world.quality import measure

GUIDANCE = (2.0, 3.0, 5.0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("names", nargs="*", default=list(zoo.MODELS))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--n", type=int, default=1000)
    args = ap.parse_args()
    for name in args.names:
        kw = {}
        model = ls.load(f"zoo:{name}")
        if zoo.MODELS[name].kind == "diffusion":
            scores = {}
            for g in GUIDANCE:
                q = measure(model, n=200, seed=10_000, num_inference_steps=args.steps, guidance_scale=g)
                scores[g] = min(q["prompt_agreement"].values())
                print(name, "selection", g, json.dumps(q["prompt_agreement"]))
            best = max(scores, key=scores.get)
            kw = dict(num_inference_steps=args.steps, guidance_scale=best)
            print(name, "picked guidance", best, "(best worst-factor agreement on the selection run)")
        q = zoo.evaluate(model, name, n=args.n, progress=False, **kw)
        if kw:
            q["settings"]["selection"] = {
                "guidance_tried": list(GUIDANCE),
                "samples": 200,
                "seed": 10_000,
                "rule": "highest minimum prompt agreement over factors",
            }
            from layerscope.world.training import write_json

            write_json(zoo.MODELS[name].folder / "quality.json", q)
        print(name, json.dumps({k: v for k, v in q.items() if k != "settings"}, indent=1))


if __name__ == "__main__":
    main()
