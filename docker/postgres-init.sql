-- One PostgreSQL server, one database per backend.
CREATE DATABASE prefect;
CREATE DATABASE mlflow;
CREATE DATABASE optuna;
