"""ament_python package `r2former_ros`; also installs with plain pip (`pip install -e .`)."""
from glob import glob

from setuptools import find_packages, setup

PACKAGE = "r2former_ros"

setup(
    name=PACKAGE,
    version="0.1.0",
    description="R2Former visual localization for ROS 2",
    packages=find_packages(include=["r2former_core", "r2former_core.*", "r2former_ros", "r2former_ros.*"]),
    package_data={"r2former_core": ["py.typed", "model/native/*.c", "model/native/*.h"]},   # compiled on first use
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{PACKAGE}"]),
        (f"share/{PACKAGE}", ["package.xml"]),
        (f"share/{PACKAGE}/launch", glob("launch/*.launch.py")),
        (f"share/{PACKAGE}/config", glob("config/*.yaml") + glob("config/*.xml")),   # incl. rosdep.yaml
        (f"share/{PACKAGE}/rviz", glob("rviz/*.rviz")),
        (f"share/{PACKAGE}/models", glob("models/*.safetensors")),
    ],
    python_requires=">=3.10",
    # As ROS 2's ament_python template: the dependencies are declared in package.xml (rosdep installs
    # them) and pinned in requirements.txt (pip); see docs/INSTALL.md.
    install_requires=["setuptools"],
    extras_require={"test": ["pytest"]},
    zip_safe=True,
    maintainer="r2former_ros maintainers",
    maintainer_email="maintainers@r2former-ros.org",
    license="Apache-2.0",
    entry_points={
        "console_scripts": [
            "r2former = r2former_core.cli.main:main",
            "localize = r2former_ros.localize_node:main",
            "build_map = r2former_ros.build_map_node:main",
            "bag_player = r2former_ros.bag_player:main",
            "demo_evaluator = r2former_ros.demo_evaluator:main",
        ],
    },
)
