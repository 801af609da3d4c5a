from setuptools import find_packages, setup

setup(
    name="ap_loss_d2",
    version="0.1.0",
    description="AP-loss (Chen et al.) for Detectron2: ranking-based classification loss for "
    "RetinaNet and Faster R-CNN, with an exact O((|P|+|N|) log |P|) error-driven update.",
    packages=find_packages(exclude=("tests", "tests.*", "tools", "tools.*", "studies", "studies.*", "configs")),
    python_requires=">=3.8",
    # No upper pins: users with a modern Detectron2 must not be downgraded. The pins needed by
    # the offline Detectron2 v0.6 fallback live in tools/d2_fallback/constraints.txt; the one
    # pin of every path (setuptools<81, for detectron2.model_zoo's pkg_resources) is applied by
    # tools/setup_env.sh, not here: this package itself does not need pkg_resources.
    install_requires=["torch", "torchvision", "fvcore", "pycocotools", "numpy", "tqdm", "matplotlib"],
    # "vis": OpenCV for Detectron2's Visualizer (Fig. 5 / 12); tools/setup_env.sh installs
    # opencv-python-headless==4.11.0.86, the newest release that works with numpy 1.x and 2.x.
    extras_require={"test": ["pytest"], "vis": ["opencv-python-headless>=4.10.0.84"]},
)
