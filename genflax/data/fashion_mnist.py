"""Fashion-MNIST from its original IDX files on this machine, as a local tfds builder.

Debian's `dataset-fashion-mnist` package puts the four files in
DEFAULT_DIR; `config.data.idx_dir` names another directory holding them
(as downloaded from the dataset's site, gzipped or not). Their contents are
checked against the sha256 of the originals, so `fashion_mnist` means the
same 60,000 train / 10,000 test images wherever it was prepared.
"""
import hashlib

from genflax.data import idx
from genflax.errors import UserError

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
SITE = "https://github.com/zalandoresearch/fashion-mnist"
# sha256 of each file's uncompressed bytes (the site's .gz files and Debian's
# differ as gzip files, not in these).
SHA256 = {
    "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}
HOW_TO_GET = (f"get Fashion-MNIST's with Debian's package dataset-fashion-mnist (`apt-get "
              f"install dataset-fashion-mnist` puts them in {DEFAULT_DIR}), or download the "
              f"four .gz files from {SITE} and name their directory in --config.data.idx_dir")


class FashionMnist(idx.IdxBuilder, skip_registration=True):
  """Zalando's Fashion-MNIST: 28x28 grey article photos, 10 classes, 6,000 / 1,000 each.

  Splits: the official 60,000 "train" and 10,000 "test" images, in the files' order.
  """

  name = "fashion_mnist"  # not registered: tfds's catalogue has its own of that name
  RELEASE_NOTES = {"1.0.0": "The original IDX files, checked by sha256."}
  CLASS_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                 "Sneaker", "Bag", "Ankle boot"]
  DESCRIPTION = f"Fashion-MNIST ({SITE}), from its original IDX files."
  DEFAULT_DIR = DEFAULT_DIR
  HOW_TO_GET = HOW_TO_GET

  def _arrays(self):
    arrays = {}
    for stem, path in self.paths.items():
      data = idx.contents(path)
      digest = hashlib.sha256(data).hexdigest()
      if digest != SHA256[stem]:
        raise UserError(f"{path} is not Fashion-MNIST's {stem}: its uncompressed sha256 is "
                        f"{digest}, not {SHA256[stem]}; the originals are in Debian's "
                        f"package dataset-fashion-mnist and at {SITE}")
      arrays[stem] = idx.parse(data, path)
    return arrays
