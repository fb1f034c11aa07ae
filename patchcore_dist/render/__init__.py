"""What people look at: heatmap colouring and encoding, the HTML evaluation report."""
