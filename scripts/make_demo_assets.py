"""Train the demo model and write recalib/demo_assets/ (run once; the assets are committed).

python scripts/make_demo_assets.py
"""

from __future__ import annotations

import numpy as np
import torch

from recalib.demo import ASSETS, accuracy, make_images, shift_domain, train_demo_model


def main() -> None:
    torch.set_num_threads(2)
    x, y = make_images(3000, seed=1)
    model = train_demo_model(x, y)
    xt, yt = make_images(512, seed=2)
    xc, _ = make_images(512, seed=3)
    shifted_test, shifted_cal = shift_domain(xt, seed=4), shift_domain(xc, seed=5)
    ASSETS.mkdir(exist_ok=True)
    program = torch.export.export(
        model, (torch.from_numpy(xt[:2]),), dynamic_shapes=({0: torch.export.Dim("batch")},)
    )
    torch.export.save(program, ASSETS / "demo_model.pt2")
    np.savez_compressed(ASSETS / "demo_calibration.npz", x=shifted_cal.astype(np.float16))
    np.savez_compressed(
        ASSETS / "demo_test.npz",
        x=shifted_test.astype(np.float16),
        y=yt,
        x_source=xt.astype(np.float16),
        y_source=yt,
    )
    print(f"source accuracy  {accuracy(model, xt, yt):.3f}")
    print(f"shifted accuracy {accuracy(model, shifted_test, yt):.3f}")


if __name__ == "__main__":
    main()
