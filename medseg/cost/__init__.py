"""What a model and a volume cost before any GPU is rented: FLOPs (analytic and counted) and memory."""
