"""The synthetic pose world: procedural dancing figures with exact keypoints, and the network that reads them."""
