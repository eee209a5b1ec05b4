"""One module per command, one public function named after it; `api` re-exports them. Tasks never import
tasks: what two of them share lives in a lower layer."""
