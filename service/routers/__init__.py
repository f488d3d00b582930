"""One router per file: health, inspect, products (+ references), system (/models), metrics."""
