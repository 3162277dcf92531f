"""Settings every CLI test run shares: SmallCNN on digits, small batches, no progress bars."""

COMMON = ["--model", "smallcnn", "--dataset", "digits", "--batch-size", "64", "--no-progress",
          "--set", "channels_last=False"]
