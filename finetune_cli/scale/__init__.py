"""Scale-out on Ray: engine checks and the connection (`backend`), sharded prediction and features
(`ray_data`), and Ray Tune trials (`ray_tune`)."""
